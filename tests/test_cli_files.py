"""The files a command line names (issue 24, item 10): FIFOs, devices, directories,
oversized or deeply nested JSON and unwritable outputs refused with a message naming the
flag and the path, before anything opens them (a FIFO would block the open)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from adaptive_moe.cli import main
from adaptive_moe.core import fileio


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_input_file_refusals(tmp_path, fifo):
    with pytest.raises(ValueError, match=r"--x .*pipe: not a regular file"):
        fileio.check_input_file(fifo, "--x")
    with pytest.raises(ValueError, match="is a directory"):
        fileio.check_input_file(tmp_path, "--x")
    with pytest.raises(ValueError, match="no such file"):
        fileio.check_input_file(tmp_path / "none", "--x")
    big = tmp_path / "big"
    big.write_bytes(b"0" * 101)
    with pytest.raises(ValueError, match="101 bytes, more than the 100"):
        fileio.read_input(big, "--x", max_bytes=100)
    assert fileio.read_input(big, "--x", max_bytes=101) == b"0" * 101


def test_read_json_bounds(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested 100000 deep"):
        fileio.read_json(deep, "--config")
    # Brackets inside strings are data, not nesting.
    quoted = tmp_path / "quoted.json"
    quoted.write_text(json.dumps({"s": "[" * 500 + '\\"{'}))
    assert fileio.read_json(quoted, "--config") == {"s": "[" * 500 + '\\"{'}
    binary = tmp_path / "bin.json"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="not a text"):
        fileio.read_json(binary, "--config")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": ')
    with pytest.raises(ValueError, match=r"--config .*broken\.json: not valid JSON"):
        fileio.read_json(broken, "--config")


def test_output_refusals(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        fileio.check_output_dir(afile, "--out")
    with pytest.raises(ValueError, match="is a directory; name a file"):
        fileio.check_output_file(tmp_path, "--out")
    with pytest.raises(ValueError, match="is not a directory"):
        fileio.check_output_file(afile / "table.msgpack", "--out")
    assert fileio.check_output_dir(tmp_path / "new" / "run", "--out") == tmp_path / "new" / "run"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            with pytest.raises(ValueError, match="is not writable"):
                fileio.check_output_file(locked / "t.msgpack", "--out")
        finally:
            locked.chmod(stat.S_IRWXU)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv",
    [
        ["calc", "params", "--config", "{fifo}"],
        ["plan", "--config", "{fifo}", "--roofline", "h100"],
        ["profile", "--config", "{fifo}"],
        ["train", "--data", "{fifo}", "--steps", "1"],
    ],
    ids=lambda a: a[0],
)
def test_commands_refuse_a_fifo_without_blocking(tmp_path, fifo, capsys, argv):
    argv = [a.format(fifo=fifo) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusal of a flag's value
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert "pipe" in err and "not a regular file" in err
