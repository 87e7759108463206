"""The ``captioning`` command, the flag types every tool shares, and how the tools write their outputs."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import cli
from captioning.cli_args import int_at_least, int_between, non_negative_float, port, positive_float, positive_int
from captioning.data.files import check_writable, write_json, write_text, writing_alone
from captioning.errors import InputError
from tests.conftest import PROJECT_ROOT

COMMAND = [sys.executable, "-m", "captioning.cli"]


def _run(*arguments: str) -> subprocess.CompletedProcess:
    """The command in a process of its own (slow: each one imports torch); ``_main`` runs it in this one."""
    return subprocess.run([*COMMAND, *arguments], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)


@pytest.fixture()
def run(capsys):
    """``run(*arguments)`` -> ``_run``'s result, from ``captioning.cli.main`` in this process."""

    def run_here(*arguments: str) -> subprocess.CompletedProcess:
        status = cli.main(list(arguments))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(arguments, status, captured.out, captured.err)

    return run_here


# ---------------------------------------------------------------- the command


def test_the_overview_lists_every_command_and_exit_status_without_importing_torch() -> None:
    """``captioning --help`` is fast because it imports none of the heavy modules (no timing: a loaded machine
    would make one flaky)."""
    probe = ("import sys; from captioning.cli import main; status = main(['--help']); "
             "print('LOADED', [m for m in ('torch', 'numpy', 'omegaconf') if m in sys.modules]); sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout
    for name in ("caption", "evaluate", "prepare", "serve", "export"):
        assert f"  {name} " in done.stdout
    text = " ".join(done.stdout.split())
    assert "exit status: 0 done; 1 " in text and "2 usage or input error" in text


@pytest.mark.slow
def test_the_entry_point_runs_a_command_in_its_own_process() -> None:
    done = _run("caption", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: captioning caption")


@pytest.mark.parametrize("name", ["caption", "evaluate", "prepare", "serve", "export"])
def test_each_command_has_help_with_the_exit_status(run, name: str) -> None:
    done = run(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: captioning {name}")
    if name in ("caption", "evaluate", "prepare"):
        assert "exit status: 0 done" in " ".join(done.stdout.split())


def test_the_shared_flags_are_named_alike(run) -> None:
    shared = {"caption": ("--checkpoint", "--output", "--batch-size", "--device", "--beam-size"),
              "evaluate": ("--output",), "prepare": ("--output",), "serve": ("--checkpoint", "--device", "--beam-size"),
              "export": ("--checkpoint", "--output")}
    assert set(shared) == set(cli.SUBCOMMANDS)  # a new command is added here too
    for name, flags in shared.items():
        text = " ".join(run(name, "--help").stdout.split())
        assert all(flag in text for flag in flags), name


def test_an_unknown_or_missing_command_is_a_usage_error(run) -> None:
    done = run("captoin", "x.jpg")
    assert done.returncode == 2 and "unknown command 'captoin'" in done.stderr and "caption" in done.stderr
    done = run()
    assert done.returncode == 2 and "usage: captioning" in done.stderr


def test_a_command_that_is_not_installed_is_named_without_a_traceback(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "serve", ("captioning.no_such_module", "a demo page"))
    assert cli.main(["serve", "--help"]) == 2
    error = capsys.readouterr().err
    assert "the serve command is not part of this installation" in error and "Traceback" not in error


def test_a_command_runs_with_its_arguments_and_its_status(run, tmp_path: Path) -> None:
    done = run("evaluate", str(tmp_path / "absent.json"), "--annotations", str(tmp_path / "a.json"))
    assert done.returncode == 2 and "absent.json" in done.stderr and done.stdout == ""
    done = run("caption", "x.jpg", "--checkpoint", "c.ckpt", "--beam-size", "0")
    assert done.returncode == 2 and "--beam-size" in done.stderr and "usage: captioning caption" in done.stderr


# ---------------------------------------------------------------- flag types


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-0.5", "x", ""])
def test_a_non_negative_float_refuses_nan_infinity_and_negatives(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        non_negative_float(text)
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float(text)


def test_a_positive_float_refuses_zero_and_a_port_its_range() -> None:
    assert positive_float("0.5") == 0.5 and port("0") == 0 and port("65535") == 65535 and int_between(1, 3)("3") == 3
    for parse, text, message in ((positive_float, "0", "must be a finite number > 0, got '0'"),
                                 (port, "65536", "must be from 0 to 65535, got 65536"),
                                 (port, "-1", "must be from 0 to 65535, got -1"),
                                 (port, "80.5", "must be a whole number from 0 to 65535, got '80.5'")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_the_int_types_hold_their_bounds() -> None:
    assert non_negative_float("0") == 0.0 and non_negative_float("0.7") == 0.7
    assert positive_int("3") == 3 and int_at_least(32)("32") == 32
    for parse, text in ((positive_int, "0"), (positive_int, "1.5"), (positive_int, "nan"), (int_at_least(32), "31")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1"])
def test_caption_refuses_a_length_penalty_out_of_range_before_anything_loads(run, value: str, tmp_path: Path) -> None:
    done = run("caption", "x.jpg", "--checkpoint", str(tmp_path / "absent.ckpt"), "--length-penalty", value)
    assert done.returncode == 2
    assert "--length-penalty" in done.stderr and "absent.ckpt" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("flag", "value"), [("--image-size", "31"), ("--image-size", "nan"), ("--workers", "-1"),
                                             ("--show", "-2"), ("--min-word-count", "0"),
                                             ("--max-caption-length", "inf")])
def test_prepare_refuses_numbers_out_of_range_naming_the_flag(run, flag: str, value: str, tmp_path: Path) -> None:
    done = run("prepare", "--format", "images", "--images", str(tmp_path), flag, value)
    assert done.returncode == 2 and flag in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- output files


def test_write_text_replaces_whole_and_an_encoding_error_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text(target, "old\n")
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: a lone surrogate once decoded
    with pytest.raises(UnicodeEncodeError):
        write_text(target, f"{name}\ta cat\n")
    assert target.read_text() == "old\n"
    write_text(target, f"{name}\ta cat\n", errors="surrogateescape")
    assert target.read_bytes() == b"caf\xe9.png\ta cat\n"  # the name's own bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left


def test_write_text_makes_a_file_the_umask_allows(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_write_json_still_refuses_non_finite_numbers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['loss'\]"):
        write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir())


def test_check_writable_names_the_flag_and_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=r"--output .*file/sub/out.json cannot be written"):
        check_writable(blocker / "sub" / "out.json", "--output")
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path, "--output")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable(blocker, "--attention-maps", folder=True)
    check_writable(tmp_path / "new" / "maps", "--attention-maps", folder=True)
    assert (tmp_path / "new" / "maps").is_dir() and not list((tmp_path / "new" / "maps").iterdir())


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path: Path) -> None:
    target = tmp_path / "captions.json"
    with writing_alone(target, "--output"):
        with pytest.raises(InputError, match="another process is writing --output"):
            with writing_alone(target, "--output"):
                pass
    with writing_alone(target, "--output"):  # released: the next run may write
        pass


def _hold_the_lock(target: Path) -> subprocess.Popen:
    """Another process holding ``target``'s output lock (as a running ``caption`` does) until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from captioning.data.files import writing_alone\n"
                               f"with writing_alone(Path({str(target)!r}), '--output'):\n"
                               "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_caption_stops_at_once_while_another_process_writes_its_output(run, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    output = tmp_path / "captions.json"
    output.write_text("the first run's captions\n")
    holder = _hold_the_lock(output)
    try:
        done = run("caption", str(image), "--checkpoint", str(tmp_path / "absent.ckpt"), "--output", str(output))
    finally:
        holder.communicate("")
    assert done.returncode == 2 and "another process is writing --output" in done.stderr
    assert "absent.ckpt" not in done.stderr  # refused before the checkpoint is even looked at
    assert output.read_text() == "the first run's captions\n"
    done = run("caption", str(image), "--checkpoint", str(tmp_path / "absent.ckpt"), "--output", str(output))
    assert done.returncode == 2 and "absent.ckpt" in done.stderr  # once released, the run goes on


def test_evaluate_stops_at_once_while_another_process_writes_its_output(run, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    holder = _hold_the_lock(metrics)
    try:
        done = run("evaluate", str(tmp_path / "absent.json"), "--annotations", str(tmp_path / "a.json"),
                   "--output", str(metrics))
    finally:
        holder.communicate("")
    text = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"another process is writing --output {metrics}" in text
    assert "absent.json" not in text and not metrics.exists()


@pytest.mark.parametrize("flag", ["--output", "--attention-maps"])
def test_caption_finds_an_unwritable_output_before_loading_the_model(run, flag: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run("caption", str(blocker), "--checkpoint", str(tmp_path / "absent.ckpt"), flag, str(blocker / "out"))
    assert done.returncode == 2 and f"{flag} {blocker / 'out'}" in done.stderr and "cannot be written" in done.stderr
    assert "absent.ckpt" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--output", "--per-image"])
def test_evaluate_finds_an_unwritable_output_before_scoring(run, flag: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run("evaluate", str(tmp_path / "absent.json"), "--annotations", str(tmp_path / "a.json"),
                flag, str(blocker / "m.json"))
    text = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"{flag} {blocker / 'm.json'}" in text and "absent.json" not in text


@pytest.mark.parametrize("flag", ["--output", "--image-cache"])
def test_prepare_finds_an_unwritable_output_before_reading_images(run, flag: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run("prepare", "--format", "images", "--images", str(tmp_path / "absent"), flag, str(blocker / "out"))
    text = " ".join(done.stderr.split())
    assert done.returncode == 2 and f"{flag} {blocker / 'out'}" in text and "absent" not in text.replace(
        str(blocker / "out"), "")


@pytest.mark.slow
def test_evaluate_writes_its_outputs_whole(run, tmp_path: Path) -> None:
    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                       "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                                                       {"id": 2, "image_id": 1, "caption": "a square"}]}))
    results = tmp_path / "r.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a red square"}]))
    metrics = tmp_path / "out" / "metrics.json"
    done = run("evaluate", str(results), "--annotations", str(annotations), "--no-spice", "--output", str(metrics))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(metrics.read_text())["Bleu_1"] > 0.9
    assert sorted(p.name for p in metrics.parent.iterdir()) == [".metrics.json.lock", "metrics.json"]
