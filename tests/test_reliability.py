"""Interrupted and concurrent runs: SIGKILL at many points then --resume, Ctrl-C, SIGTERM, the lock, a full disk.

Runs are real ``compress.run`` command lines. Killed runs die by SIGKILL at a
named point (``COMPRESS_FAILPOINT``, see compress/failpoints.py): inside the
atomic write of a named file, or when the run logs a given message. They run as
processes forked from a server that has imported torch once (multiprocessing's
forkserver), so that a dozen runs do not pay a dozen interpreter starts; the
Ctrl-C test uses a plain subprocess, as a user's shell would.
"""
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from compress import rundir
from compress import run as run_cli
from compress.codec import container
from compress.errors import InputError

# The embedded quick-start on scikit-learn's digits, shrunk; one thread so that the bits do not depend on load.
FAST = ["--set", "pretrain.epochs=2", "--set", "stages.prune.rounds=2", "--set", "stages.prune.retrain.epochs=1",
        "--set", "stages.quantize.finetune.epochs=1", "--set", "model.hidden=[32]", "--set", "run.threads=1"]

# SIGKILL points, in the order a run reaches them; each resumed run dies at the next one.
KILL_POINTS = [
    "log:pretrain: 2 epochs",  # the folder holds recipe.toml and versions.json, training starts
    "write:pretrain.pt",  # the baseline's checkpoint is complete in its temporary file, not yet renamed
    "log:prune round 1/2",  # between two pruning rounds
    "write:01-prune.pt",
    "log:stage quantize (kmeans)",
    "write:02-quantize.pt",
    "write:model.dcz",  # the model file's streams are written, its table not yet
    "log:decoded model.dcz",  # the encode stage's checkpoint saved and its file verified; no report yet
    "write:report.json",
]


# --- running the CLI in forked processes ------------------------------------------------------------------


def _child(argv: list[str], env: dict, log: str) -> None:
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = run_cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def forked():
    """``start(argv, failpoint, log) -> Process`` running ``python -m compress.run ARGV`` in a forked child."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sklearn.datasets", "matplotlib.pyplot", "compress.pipeline",
                                "compress.run"])

    def start(argv: list[str], failpoint: str | None, log: Path):
        env = {"COMPRESS_FAILPOINT": failpoint} if failpoint else {}
        if not failpoint:
            os.environ.pop("COMPRESS_FAILPOINT", None)
        p = ctx.Process(target=_child, args=(argv, env, str(log)), daemon=True)
        p.start()
        started.append(p)
        return p

    started = []
    yield start
    for p in started:  # a failed test must not leave a paused run behind
        if p.is_alive():
            p.kill()


def run_to_end(start, argv, failpoint, log: Path, timeout: float = 300) -> int:
    p = start(argv, failpoint, log)
    p.join(timeout)
    assert p.exitcode is not None, f"still running after {timeout} s"
    return p.exitcode


def assert_whole(run_dir: Path) -> None:
    """Every file a reader would look at is complete; only hidden temporaries and the lock may be partial."""
    for path in run_dir.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".toml":
            tomllib.loads(data.decode())
        elif path.suffix == ".dcz":
            container.read(data)
        elif path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), path
        elif path.suffix == ".md":
            assert data.startswith(b"# ") and data.endswith(b"\n"), path
        else:
            assert path.name == "run.log", path
            data.decode()


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob(".*"))


# --- SIGKILL anywhere, then --resume ---------------------------------------------------------------------------


def test_reliability_sigkill_at_every_stage_then_resume_gives_the_same_file(forked, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert run_to_end(forked, ["--out", str(reference), *FAST], None, tmp_path / "reference.log") == 0
    for i, point in enumerate(KILL_POINTS):
        log = tmp_path / f"kill-{i}.log"
        code = run_to_end(forked, ["--out", str(run), "--resume", *FAST], f"kill@{point}", log)
        assert code == -signal.SIGKILL, (point, code, log.read_text()[-2000:])
        assert f"failpoint: kill at {point}" in log.read_text()
        assert_whole(run)
        if i:  # the killed run held the folder: its lock file stays behind, stale
            assert (run / rundir.LOCK_NAME).exists()
    log = tmp_path / "final.log"
    assert run_to_end(forked, ["--out", str(run), "--resume", *FAST], None, log) == 0, log.read_text()
    assert (run / "model.dcz").read_bytes() == (reference / "model.dcz").read_bytes()
    assert_whole(run)
    assert leftovers(run) == []  # no lock, no temporary file
    text = (run / "run.log").read_text()
    assert text.count("cleared a stale lock") == len(KILL_POINTS)
    assert "unfinished write of a run that was stopped" in text  # e.g. the model file's temporary
    report = json.loads((run / "report.json").read_text())
    assert report["bit_exact"] and [s.get("resumed", False) for s in report["stages"]] == [True] * 4


def test_reliability_sigterm_stops_cleanly_with_143(forked, tmp_path):
    log = tmp_path / "term.log"
    p = forked(["--out", str(tmp_path / "r"), *FAST], "pause@log:stage prune", log)
    wait_for(lambda: log.exists() and "failpoint: pause" in log.read_text(), p)
    os.kill(p.pid, signal.SIGTERM)
    p.join(60)
    assert p.exitcode == 143
    assert log.read_text().splitlines()[-1] == ("interrupted: finished stages are kept; run again with --resume to "
                                                "continue (SIGTERM)")
    assert leftovers(tmp_path / "r") == [] and (tmp_path / "r" / "pretrain.pt").is_file()


def wait_for(condition, process, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not condition():
        assert process.is_alive() if hasattr(process, "is_alive") else process.poll() is None, "the run ended early"
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


# --- Ctrl-C and a second run on the same folder ------------------------------------------------------------


def test_reliability_second_run_is_refused_and_ctrl_c_stops_with_130(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent),
           "COMPRESS_FAILPOINT": "pause@log:stage quantize"}
    # SIG_DFL: a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored
    first = subprocess.Popen([sys.executable, "-m", "compress.run", "--out", str(out), *FAST], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        while not lines or not lines[-1].startswith("failpoint: pause"):
            line = first.stderr.readline()
            assert line, "the run ended before its pause point: " + "".join(lines)
            lines.append(line)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        # a second run on the same folder, while the first is running: refused, and writes nothing
        assert run_cli.main(["--out", str(out), *FAST]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"output folder {out} is in use by another run (pid {first.pid}" in err[0], err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        first.send_signal(signal.SIGINT)
        rest = first.communicate(timeout=60)[1]
    finally:
        first.kill()
    assert first.returncode == 130
    assert "Traceback" not in rest
    assert rest.splitlines()[-1] == "interrupted: finished stages are kept; run again with --resume to continue (SIGINT)"
    assert_whole(out)
    assert leftovers(out) == [] and (out / "stages" / "01-prune.pt").is_file()


def test_rundir_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    with rundir.RunLock(tmp_path) as first:
        assert first.stale is None
        with pytest.raises(InputError, match=rf"in use by another run \(pid {os.getpid()} on "):
            rundir.RunLock(tmp_path).acquire()
    assert not (tmp_path / rundir.LOCK_NAME).exists()  # released: removed
    # a run killed while holding the folder leaves the file; nobody holds the flock any more
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": 1.0}))
    with rundir.RunLock(tmp_path) as lock:
        assert lock.stale["pid"] == int(dead.stdout)
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_rundir_removes_only_hidden_temporaries(tmp_path):
    (tmp_path / "stages").mkdir()
    for name in (".model.dcz.abc.tmp", "stages/.01-prune.pt.x.tmp", "model.dcz", "notes.tmp", ".lock"):
        (tmp_path / name).write_text("x")
    removed = rundir.remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".01-prune.pt.x.tmp", ".model.dcz.abc.tmp"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".lock", "model.dcz", "notes.tmp"]


# --- a full disk --------------------------------------------------------------------------------------------


DATA_FREE = """[run]
name = "disk"
threads = 1
[model]
name = "mlp"
hidden = [16]
[stages.prune]
sparsity = 0.5
retrain = { epochs = 0 }
[stages.quantize]
method = "kmeans"
bits = 3
finetune = { epochs = 0 }
[stages.encode]
"""


class Disk:
    """``os.fdopen`` for writing, on a disk with ``free`` bytes left; records what was written to which file."""

    def __init__(self, free: float, real=os.fdopen):
        self.free, self.real, self.writes = free, real, []

    def fdopen(self, fd, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{fd}")
        f = self.real(fd, mode, *args, **kwargs)
        return f if "w" not in mode else _QuotaFile(f, self, name)


class _QuotaFile:
    def __init__(self, f, disk: Disk, name: str):
        self.f, self.disk = f, disk
        disk.writes.append([name, 0])

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.disk.free:
            self.f.write(bytes(memoryview(data).cast("B")[:int(self.disk.free)]))
            self.disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= n
        self.disk.writes[-1][1] += n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def target_of(temp: str) -> str:
    """The artifact a temporary file is written for: ``.<name>.<random>.tmp`` -> ``<name>``."""
    return temp[1:].rsplit(".", 2)[0]


def test_reliability_full_disk_fails_in_one_line_and_keeps_the_previous_artifacts(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(DATA_FREE)
    out = tmp_path / "out"
    assert run_cli.main([str(recipe), "--out", str(out)]) == 0
    old = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.log"}
    changed = [str(recipe), "--out", str(out), "--set", "stages.quantize.bits=2"]  # every artifact changes
    disk = Disk(float("inf"))  # first: which files a rerun writes, in which order, how many bytes each
    monkeypatch.setattr(os, "fdopen", disk.fdopen)
    assert run_cli.main(changed) == 0
    monkeypatch.undo()
    writes = [(target_of(Path(name).name), size) for name, size in disk.writes]
    targets = [t for t, _ in writes]
    assert {"recipe.toml", "01-prune.pt", "02-quantize.pt", "model.dcz", "report.json", "weights.png"} <= set(targets)
    capsys.readouterr()
    used = 0
    for i, (target, size) in enumerate(writes):
        for path, data in old.items():  # the previous complete run
            path.write_bytes(data)
        monkeypatch.setattr(os, "fdopen", Disk(used + size // 2).fdopen)  # full halfway through this file
        code = run_cli.main(changed)
        monkeypatch.undo()
        used += size
        err = capsys.readouterr().err.splitlines()
        assert code == 1, (target, err)
        named = ".compare." if target.startswith(".compare.") else target  # the other coder's size, measured
        assert err[-1].startswith("error: cannot write ") and named in err[-1], (target, err[-1])
        assert err[-1].endswith("No space left on device; the files already there are intact"), err[-1]
        assert "Traceback" not in "\n".join(err)
        assert_whole(out)
        assert leftovers(out) == []  # the lock released, the temporary file removed
        for path, data in old.items():  # this file and every later one: still the previous run's
            if path.name in targets[i:] and path.name not in targets[:i]:
                assert path.read_bytes() == data, (target, path)


class _Evil:
    """Unpickling this runs a command: what a planted checkpoint would do to a trusting loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reliability_planted_stage_checkpoint_is_refused_unrun_and_redone(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(DATA_FREE)
    out, marker = tmp_path / "out", tmp_path / "ran"
    assert run_cli.main([str(recipe), "--out", str(out)]) == 0
    before = (out / "model.dcz").read_bytes()
    torch.save({"fingerprint": "x", "model": _Evil(marker)}, out / "stages" / "01-prune.pt")
    (out / "stages" / "02-quantize.pt").write_bytes(b"truncated")
    assert run_cli.main([str(recipe), "--out", str(out), "--resume"]) == 0
    assert not marker.exists()
    log = (out / "run.log").read_text()
    assert "01-prune.pt: unreadable, redoing it (Unsupported global: GLOBAL posix.system)" in log
    assert "02-quantize.pt: unreadable, redoing it" in log
    report = json.loads((out / "report.json").read_text())
    # prune and quantize redone (to the same weights); the encode checkpoint, still valid, is reused
    assert [s.get("resumed", False) for s in report["stages"]] == [False, False, False, True]
    assert (out / "model.dcz").read_bytes() == before


def test_pipeline_seed_stage_ignores_what_earlier_stages_drew():
    from compress import pipeline

    torch.manual_seed(1)
    torch.rand(100)  # an earlier stage (dropout, say) drew numbers in this process...
    pipeline.seed_stage(0, "quantize")
    a = torch.rand(4)
    torch.manual_seed(2)  # ...or did not: the run was resumed
    pipeline.seed_stage(0, "quantize")
    assert torch.equal(torch.rand(4), a)
    pipeline.seed_stage(0, "prune")
    assert not torch.equal(torch.rand(4), a)
