"""The batch job's output file: one JSON result record per line, safe to resume and to share.

Guarantees, in the order `ResultsFile.open` establishes them:
  * the output is never the input file (also through links or a second hard link);
  * one job at a time: an exclusive lock on a hidden `.<output name>.pipemax-lock` beside it,
    taken without waiting; a second job on the same output refuses at once, naming the first's pid;
  * an existing file is ours (every line a result record) or it is left untouched, unless the
    user asked to overwrite it;
  * on resume only successful records (status_code 200, error null) count as done. Every other
    record leaves the file, so its request runs again, and a line cut short by a kill is
    dropped. That cleanup is one atomic rewrite (temporary file, fsync, rename, fsync of the
    folder): a kill at any moment leaves either the old file or the new one, never a mix.
Results are appended and fsynced one by one as requests finish.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

# json.dumps of our records starts with this: the only torn fragment we cut is one we wrote.
RECORD_PREFIX = b'{"id": "pipemax-'


class OutputFileError(Exception):
    """A job-level problem with the input or output path: one line, naming the fix."""


def is_result_record(record) -> bool:
    """One of our records: a results file of another tool (OpenAI's, vLLM's) is not ours to rewrite.
    The OpenAI batch format lets `response` be null (a request that failed before any response)."""
    return (isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"].startswith("pipemax-")
            and isinstance(record.get("custom_id"), str) and "response" in record
            and (record["response"] is None or isinstance(record["response"], dict)) and "error" in record)


def is_success(record: dict) -> bool:
    """Done, and skipped on resume: a 200 response and no error. Anything else runs again, whoever
    wrote it: an HTTP error comes back as `error: null` with the status in `response` (OpenAI's
    format), a failure before any response as `response: null` with `error` set."""
    response = record["response"]
    return record["error"] is None and response is not None and response.get("status_code") == 200


@dataclass
class ExistingResults:
    keep: list[bytes]  # whole lines (newline included) of successful records
    done: set[str]  # their custom_ids
    dropped_errors: int  # error records that leave the file (their requests run again)
    torn: bool  # a fragment without its newline, cut by a kill


def read_existing(path: Path) -> ExistingResults:
    """Sort an existing output file's lines; OutputFileError if it is not a results file."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    fragment = lines.pop()  # b"" when the file ends with a newline
    keep, done, dropped = [], set(), 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not is_result_record(record):
            raise OutputFileError(f"line {number} is not a result record")
        if is_success(record):
            keep.append(line + b"\n")
            done.add(record["custom_id"])
        else:
            dropped += 1
    torn = bool(fragment.strip())
    if torn and not fragment.startswith(RECORD_PREFIX):
        raise OutputFileError(f"its last line ({len(lines) + 1}) is not a result record")
    return ExistingResults(keep, done, dropped, torn)


def atomic_write(path: Path, chunks: list[bytes]) -> None:
    """Replace path's content: temporary file in the same folder, fsync, rename, fsync the folder."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.writelines(chunks)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _rewrite(path: Path, chunks: list[bytes]) -> None:
    try:
        atomic_write(path, chunks)
    except OSError as error:
        raise OutputFileError(f"cannot rewrite {path} ({error.strerror}); it is unchanged: fix that and run the "
                              "same command again") from None


class JobLock:
    """An exclusive, non-blocking flock on `.<output name>.pipemax-lock`, released (and the file
    removed) on close. A name of our own, opened without following links: no user file is touched.

    The kernel drops the lock when the process dies, SIGKILL included, so a stale lock file never
    blocks a later job. After locking we check that the path still names the file we locked: a job
    that finished may have removed it between our open and our lock."""

    def __init__(self, output: Path):
        self.path = output.with_name(f".{output.name}.pipemax-lock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                raise OutputFileError(f"cannot create {self.path} in {output.parent} ({error.strerror}): "
                                      "choose an output file in a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputFileError(f"another job (pid {holder}) is writing {output}: wait for it to finish, "
                                      "or choose another output file") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # still under the lock: a waiting opener sees the change and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def check_input(path: Path) -> None:
    if not path.exists():
        raise OutputFileError(f"input file {path} not found")
    if path.is_dir():
        raise OutputFileError(f"input {path} is a folder: name a .jsonl file of requests")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise OutputFileError(f"cannot read input file {path} ({error.strerror})") from None


def resolve_output(input_path: Path, output: Path) -> Path:
    """The real output path (links followed, so a rewrite replaces the target, not the link)."""
    real = output.resolve()
    if real.is_dir():
        raise OutputFileError(f"output {output} is a folder: name a file, e.g. {output / 'results.jsonl'}")
    if real == input_path.resolve() or (real.exists() and os.path.samefile(real, input_path)):
        raise OutputFileError(f"output {output} is the input file: results would overwrite the requests; "
                              "choose another output file")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFileError(f"cannot create the folder of {output} ({error.strerror}): choose another "
                              "output file") from None
    return real


class ResultsFile:
    """The locked output of one job: which custom_ids are done, and an append-only writer."""

    def __init__(self, path: Path, lock: JobLock, done: set[str], existing_records: int):
        self.path = path
        self.lock = lock
        self.done = done
        self.num_records = existing_records  # lines in the file now
        self.written = 0  # records written by this job
        try:
            self.file = open(path, "ab", buffering=0)
        except OSError as error:
            lock.release()
            raise OutputFileError(f"cannot write results to {path} ({error.strerror}): choose another "
                                  "output file") from None

    @classmethod
    def open(cls, input_path: Path, output: Path, overwrite: bool = False) -> tuple[ResultsFile, int]:
        """Lock, check and clean the output; returns it and the number of error records dropped."""
        check_input(input_path)
        path = resolve_output(input_path, output)
        lock = JobLock(path)
        try:
            existing = ExistingResults([], set(), 0, False)
            if path.exists() and overwrite:
                _rewrite(path, [])
            elif path.exists():
                try:
                    existing = read_existing(path)
                except OutputFileError as error:
                    raise OutputFileError(f"output {output} exists and is not a PipeMax results file ({error}); "
                                          "choose another output file, or pass --overwrite to replace it") from None
                except OSError as error:
                    raise OutputFileError(f"cannot read the existing output {output} ({error.strerror})") from None
                if existing.dropped_errors or existing.torn:
                    _rewrite(path, existing.keep)
            return cls(path, lock, existing.done, len(existing.keep)), existing.dropped_errors
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def serialize(record: dict) -> bytes:
        """One JSON line. ValueError for NaN or infinity, which JSON cannot hold."""
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        try:
            return text.encode() + b"\n"
        except UnicodeEncodeError:  # a lone surrogate from the input (valid JSON, not UTF-8): escape it
            return json.dumps(record, allow_nan=False).encode() + b"\n"

    def write(self, record: dict) -> None:
        self.write_line(self.serialize(record), record["custom_id"], is_success(record))

    def write_line(self, line: bytes, custom_id: str, succeeded: bool) -> None:
        """Append one serialized record and fsync it; OutputFileError if the disk refuses."""
        try:
            view = memoryview(line)
            while view:  # unbuffered: a failed write leaves nothing behind to flush at close
                view = view[self.file.write(view):]
            os.fsync(self.file.fileno())
        except OSError as error:
            raise OutputFileError(f"cannot write results to {self.path} ({error.strerror}); the {self.num_records} "
                                  "results before it are safe: fix that and run the same command again to "
                                  "resume") from None
        self.num_records += 1
        self.written += 1
        if succeeded:
            self.done.add(custom_id)

    def count_records(self) -> int:
        """Whole lines in the file now. After an interruption the counter above may lag by the one
        record whose write the signal cut in on; the file itself is the truth."""
        try:
            with open(self.path, "rb") as handle:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        except OSError:
            return self.num_records

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.lock.release()
