"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr and, opt-in, SPICE.

The pipeline is the one `COCOEvalCap.evaluate` runs: Stanford's PTB tokenizer on references and
predictions, then Bleu(4), Meteor, Rouge and Cider on the tokens. The PTB tokenizer and METEOR
are Java programs (`make system-deps` installs a runtime). SPICE needs Stanford CoreNLP 3.6.0,
which pycocoevalcap would download on first use; here it is computed only when the caller hands
over the two CoreNLP jars (`spice_jars`), so nothing is ever fetched.

pycocoevalcap's own habits that this module guards against:
- the PTB tokenizer maps output lines back to captions by position and never checks its Java exit
  status: a caption holding a carriage return shifts every later caption to the wrong image, so
  whitespace is collapsed first and the line count is checked after;
- METEOR keeps a JVM alive behind a lock that a failed call never releases (its `__del__` would
  then block forever), so the JVM is stopped here explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

ImageId = int | str

JAVA_INSTALL_HINT = (
    "install a Java runtime (`apt-get install default-jre-headless` on Debian/Ubuntu, "
    "or `make system-deps` in this repository)"
)
# The two jars pycocoevalcap's SPICE expects in pycocoevalcap/spice/lib (get_stanford_models.JAR)
SPICE_CORENLP_JARS = (f"{get_stanford_models.JAR}.jar", f"{get_stanford_models.JAR}-models.jar")
SPICE_LIB_DIR = Path(get_stanford_models.SPICEDIR).resolve() / get_stanford_models.SPICELIB
# SPICE's cache serialiser reflects into JDK internals, which Java 16+ forbids unless opened
_SPICE_JAVA_OPENS = " ".join(
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in (
        "java.lang",
        "java.util",
        "java.math",
        "java.net",
        "java.text",
        "java.io",
        "java.util.concurrent",
    )
)


def caption_scores(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    spice_jars: str | Path | None = None,
) -> dict[str, float]:
    """Corpus-level caption metrics of `predictions` against `references`, as pycocoevalcap computes them.

    Returns BLEU_1, BLEU_2, BLEU_3, BLEU_4, METEOR, ROUGE_L and CIDEr, plus SPICE when `spice_jars`
    is given, as the fractions pycocoevalcap returns (papers print 100 x these: CIDEr 1.404 is
    "140.4"). Only the images in `predictions` are scored, as the COCO evaluation scripts of
    ALBEF/mPLUG do (`params["image_id"] = predicted ids`); `references` may hold more. CIDEr's
    document frequencies come from the references of the scored images.

    SPICE is not computed unless `spice_jars` names a directory holding stanford-corenlp-3.6.0.jar
    and stanford-corenlp-3.6.0-models.jar (from stanford-corenlp-full-2015-12-09.zip); they are
    linked into pycocoevalcap's spice/lib, where its SPICE looks for them.

    Needs `java` on PATH, and write access to pycocoevalcap's package directory (its tokenizer and
    SPICE put their temporary files there).
    """
    require_java()
    _check_captions(predictions, references)
    if spice_jars is not None:
        install_spice_jars(spice_jars)

    image_ids = list(predictions)
    tokenizer = PTBTokenizer()
    gts = _ptb_tokenize(tokenizer, {i: list(references[i]) for i in image_ids})
    res = _ptb_tokenize(tokenizer, {i: [predictions[i]] for i in image_ids})

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for order, value in enumerate(bleu, start=1):
        scores[f"BLEU_{order}"] = float(value)
    scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice_jars is not None:
        scores["SPICE"] = _spice(gts, res)
    return scores


def write_caption_results(path: str | Path, predictions: Mapping[ImageId, str]) -> Path:
    """Write `predictions` in the COCO results format, `[{"image_id": ..., "caption": ...}, ...]`."""
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(
                f"prediction for image {image_id!r} is a {type(caption).__name__} ({caption!r}); expected a str"
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = [
        {"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()
    ]
    path.write_text(json.dumps(results, ensure_ascii=False))
    return path


def require_java() -> str:
    """The path of `java`, or an error saying how to install it."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "no `java` on PATH: the caption metrics' PTB tokenizer and METEOR (pycocoevalcap) are Java "
            f"programs; {JAVA_INSTALL_HINT}"
        )
    return java


def install_spice_jars(jar_dir: str | Path, lib_dir: str | Path = SPICE_LIB_DIR) -> None:
    """Link the Stanford CoreNLP 3.6.0 jars from `jar_dir` into `lib_dir`, where SPICE loads them.

    A jar already in `lib_dir` as a regular file (pycocoevalcap's own download) is kept; a link
    to elsewhere is replaced. Where links cannot be made the jars are copied.
    """
    jar_dir, lib_dir = Path(jar_dir), Path(lib_dir)
    missing = [name for name in SPICE_CORENLP_JARS if not (jar_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SPICE needs Stanford CoreNLP 3.6.0 but spice_jars={str(jar_dir)!r} lacks {', '.join(missing)}; "
            f"that directory must hold both {' and '.join(SPICE_CORENLP_JARS)} (they are in "
            f"stanford-corenlp-full-2015-12-09.zip); they are linked into {lib_dir}, where pycocoevalcap's "
            "SPICE loads them. Leave spice_jars unset to skip SPICE."
        )
    for name in SPICE_CORENLP_JARS:
        source, target = (jar_dir / name).resolve(), lib_dir / name
        if target.is_symlink():
            if target.resolve() == source:
                continue
            target.unlink()
        elif target.exists():
            continue
        try:
            target.symlink_to(source)
        except PermissionError as error:
            raise PermissionError(
                f"cannot put {name} into {lib_dir} ({error}); SPICE loads CoreNLP only from there"
            ) from error
        except OSError:
            shutil.copyfile(source, target)  # a file system without symbolic links


def _check_captions(
    predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]
) -> None:
    if len(predictions) == 0:
        raise ValueError("predictions is empty; pass at least one {image_id: caption}")
    unknown = [image_id for image_id in predictions if image_id not in references]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted image ids have no references, e.g. {unknown[:5]}; "
            f"references holds {len(references)} images, e.g. {list(references)[:5]} "
            "(check the id type: 42 and '42' differ)"
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(
                f"prediction for image {image_id!r} is a {type(caption).__name__} ({caption!r}); expected a str"
            )
        refs = references[image_id]
        if isinstance(refs, str):
            raise TypeError(
                f"references for image {image_id!r} is a single str ({refs!r}); expected a list of captions"
            )
        if len(refs) == 0:
            raise ValueError(
                f"references for image {image_id!r} is empty; every scored image needs at least one"
            )
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(
                    f"a reference of image {image_id!r} is a {type(ref).__name__} ({ref!r}); expected a str"
                )


def _ptb_tokenize(
    tokenizer: PTBTokenizer, captions: dict[ImageId, list[str]]
) -> dict[ImageId, list[str]]:
    """PTB-tokenise, lowercase and strip punctuation, keeping each image's captions in order."""
    # One caption per line: collapse every whitespace run (\r, \u2028, ... included) to a space
    coco = {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()}
    try:
        tokenized = tokenizer.tokenize(coco)
    except PermissionError as error:
        raise PermissionError(
            f"pycocoevalcap's PTB tokenizer writes a temporary file beside its jar and cannot ({error}); "
            "install pycocoevalcap where this user can write"
        ) from error
    counts = {i: len(caps) for i, caps in captions.items()}
    got = {i: len(tokenized.get(i, [])) for i in captions}
    if got != counts:
        raise RuntimeError(
            f"the PTB tokenizer returned {sum(got.values())} captions for {sum(counts.values())} inputs; "
            "its Java process probably failed (see its messages above)"
        )
    return tokenized


def _meteor(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    meteor = Meteor()  # starts `java -jar meteor-1.5.jar`: about 10 s to load its paraphrase table
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as error:  # an empty reply line (a dead JVM) fails float()
        meteor.meteor_p.kill()
        message = meteor.meteor_p.stderr.read().decode(errors="replace")[-2000:].strip()
        raise RuntimeError(f"METEOR's Java process failed: {message or error}") from error
    finally:
        _stop_meteor(meteor)
    return float(score)


def _stop_meteor(meteor: Meteor) -> None:
    # compute_score leaves its lock held when it raises and Meteor.__del__ acquires it: release
    # it, or garbage collection would hang. Stopping the JVM here frees its memory now rather
    # than whenever the object is collected; __del__ repeats these steps harmlessly later.
    if meteor.lock.locked():
        meteor.lock.release()
    process = meteor.meteor_p
    process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        with contextlib.suppress(OSError):  # stdin may still hold bytes for the dead JVM
            stream.close()


def _spice(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    # pycocoevalcap runs `java` without extra options, so the module opens go in the environment
    # variable every JDK 9+ launcher reads; Java 8 ignores it and needs none.
    previous = os.environ.get("JDK_JAVA_OPTIONS")
    os.environ["JDK_JAVA_OPTIONS"] = f"{previous or ''} {_SPICE_JAVA_OPENS}".strip()
    try:
        score, _ = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"SPICE's Java process failed with exit status {error.returncode} (see its messages above)"
        ) from error
    finally:
        if previous is None:
            del os.environ["JDK_JAVA_OPTIONS"]
        else:
            os.environ["JDK_JAVA_OPTIONS"] = previous
    return float(score)
