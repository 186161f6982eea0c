# Two commands set everything up on a fresh machine:
#   make demo   creates (or reuses) .venv and runs the main job on its embedded default
#   make test   creates (or reuses) .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUTPUT ?= demo-output

.PHONY: demo test lint venv system-deps clean

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

demo: venv system-deps
	$(BIN)/mplug demo --output $(OUTPUT)

test: venv system-deps
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(OUTPUT)
