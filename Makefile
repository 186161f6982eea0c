# Two commands set everything up on a fresh machine:
#   make demo   creates (or reuses) .venv and runs the main job on its embedded default
#   make test   creates (or reuses) .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUTPUT ?= demo-output

.PHONY: demo test lint venv system-deps test-system-deps clean

venv: $(BIN)/mplug

$(BIN)/mplug: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(BIN)/mplug

# Programs the tests and the demo use beside Python packages (a C++ compiler for DeepSpeed's CPU ops,
# a Java runtime for the caption metrics' PTB tokenizer and METEOR).
system-deps:
	@command -v g++ >/dev/null || (apt-get update && apt-get install -y g++)
	@command -v java >/dev/null || (apt-get update && apt-get install -y default-jre-headless)

# The tests also bring up a single-node Slurm cluster (Debian's slurmctld, slurmd and munge).
test-system-deps: system-deps
	@command -v slurmctld >/dev/null || (apt-get update && apt-get install -y slurmctld slurmd slurm-client munge)

demo: venv system-deps
	$(BIN)/mplug demo --output $(OUTPUT)

test: venv test-system-deps
	$(BIN)/python -m pytest -q --durations=25

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(OUTPUT)
