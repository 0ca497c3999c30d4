"""The command line's exits that come from outside: SIGTERM, and a reader that closes the pipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from rrhf_lite import cli


def test_sigterm_unwinds_and_exits_143(monkeypatch, capsys):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the test runner handles SIGTERM"
    unwound = []

    def dispatch(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
            return 0
        finally:
            unwound.append(True)  # where the run lock and open files are released

    monkeypatch.setattr(cli, "dispatch", dispatch)
    assert cli.main(["schema"]) == 128 + signal.SIGTERM
    assert unwound == [True]
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    # our handler lives only while main runs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_closed_pipe_is_not_an_internal_error():
    # `rrhf-lite schema | true`: the reader is gone before (or while) we write
    reader_gone = subprocess.Popen(["true"], stdin=subprocess.PIPE)
    reader_gone.wait()
    proc = subprocess.run([sys.executable, "-m", "rrhf_lite.cli", "schema"],
                          stdout=reader_gone.stdin, stderr=subprocess.PIPE, text=True, timeout=120)
    reader_gone.stdin.close()
    assert proc.returncode == 128 + 13, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
