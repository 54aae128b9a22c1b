"""Output manners of the CLI: `--quiet` draws no bar (even on a terminal), TQDM_DISABLE is honoured, and
`--verbose` prints an error's traceback with its causes before the one line."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import sys
import termios
import threading

import pytest

from adatsq.cli import build_parser, main
from adatsq.models.diffusers.tiny import build_tiny_pipeline

TINY_RECIPE = """
method: gptq
weight: {bits: 4, group_size: 32, symmetric: false}
activation: {bits: 8}
calibration: {samples: 2, steps: 2, batch_size: 2}
"""
BAR = "%|"  # in every tqdm bar line


def on_a_terminal(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`main(args)` with sys.stderr a pseudo-terminal of 80 columns: (exit code, what reached it)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:  # read as it comes: a full terminal buffer would block the writer
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the follower side closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(follower, "w", buffering=1) as terminal:
        assert terminal.isatty()
        monkeypatch.setattr(sys, "stderr", terminal)
        code = main(args)
        monkeypatch.undo()
    reader.join(timeout=60)
    os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.mark.parametrize(
    ("flags", "env", "bars"),
    [([], None, True), (["-q"], None, False), (["--quiet"], None, False), ([], "1", False)],
    ids=["terminal", "q", "quiet-after-the-command", "TQDM_DISABLE"],
)
def test_quiet_and_tqdm_disable_draw_no_bar_on_a_terminal(
    recipe, tmp_path, capsys, monkeypatch, flags, env, bars
):
    out = tmp_path / "ckpt"
    args = ["quantize", "reference", "--recipe", str(recipe), "--out", str(out)]
    args = [*args, *flags] if flags == ["--quiet"] else [*flags, *args]
    with monkeypatch.context() as patch:
        if env is None:
            patch.delenv("TQDM_DISABLE", raising=False)
        else:
            patch.setenv("TQDM_DISABLE", env)
        code, terminal = on_a_terminal(args, monkeypatch)
    assert code == 0, terminal
    assert capsys.readouterr().out.startswith(f"wrote {out}:")
    assert (BAR in terminal) is bars, terminal
    if not bars:
        assert terminal.strip() == "", terminal  # nothing at all: warnings only, and there are none


def test_quiet_and_verbose_contradict(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "-v", "env"])
    assert exit_info.value.code == 2 and "contradict" in capsys.readouterr().err
    args = build_parser().parse_args(["inspect", "x", "-v"])
    assert args.verbose and not args.quiet


@pytest.fixture(scope="module")
def binning_pixart(tmp_path_factory):
    """The tiny PixArt-Sigma pipeline with resolution binning left on: its sample size 8 is unknown to it."""
    folder = build_tiny_pipeline("pixart-sigma", tmp_path_factory.mktemp("pixart") / "pipe")
    settings = json.loads((folder / "adatsq_pipeline.json").read_text())
    del settings["sampling"]["extra"]["use_resolution_binning"]
    (folder / "adatsq_pipeline.json").write_text(json.dumps(settings))
    return folder


def test_verbose_shows_the_chained_traceback(binning_pixart, recipe, tmp_path, capsys):
    args = ["quantize", str(binning_pixart), "--recipe", str(recipe), "--out", str(tmp_path / "q")]
    assert main(args) == 2
    plain = capsys.readouterr().err.strip().splitlines()
    assert len(plain) == 1 and plain[0].startswith("adatsq: error: PixArtSigmaPipeline refused"), plain
    assert main(["--verbose", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: Invalid sample size" in err
    assert "The above exception was the direct cause of the following exception" in err
    assert "adatsq.errors.SamplingError: PixArtSigmaPipeline refused" in err
    assert err.strip().splitlines()[-1] == plain[0]  # the one line still comes last
