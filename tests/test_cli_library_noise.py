"""Other libraries' log records and Python warnings reach stderr only with --verbose (a real CLI process).

torchao, for one, logs notes at import when diffusers imports it: without this they would be lines
beside adatsq's one-line error. The noise here is emitted by a stand-in for such a library inside the
`env` command; what is under test is the CLI's handling of it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

NOISY_CLI = textwrap.dedent(
    """
    import logging, sys, warnings
    import adatsq.cli as cli

    def noisy_env(args):
        logging.getLogger("torchao").warning("Skipping import of cpp extensions")
        warnings.warn("a library's deprecation", FutureWarning)
        logging.getLogger("adatsq.engine").warning("adatsq's own warning")
        return 0

    build = cli.build_parser

    def parser():
        built = build()
        for child in cli._subparsers(built):
            if child.prog.endswith(" env"):
                child.set_defaults(handler=noisy_env)
        return built

    cli.build_parser = parser
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _stderr(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", NOISY_CLI, *args], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stderr.splitlines()


def test_library_noise_is_hidden_and_adatsq_warnings_shown():
    assert _stderr("env") == ["adatsq's own warning"]


def test_verbose_shows_the_libraries_records_and_warnings():
    lines = _stderr("-v", "env")
    assert "Skipping import of cpp extensions" in lines
    assert any("FutureWarning: a library's deprecation" in line for line in lines)
    assert "adatsq's own warning" in lines
