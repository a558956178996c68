"""What every script shares: the one error type for a user's mistake, the wrapper that prints it
as one line and exits 2, flag checks, the device picker, and the atomic file write.

    from cli import ArgumentParser, UserError, atomic_write, pick_device, positive_int, run_main

    if __name__ == "__main__":
        run_main(main)          # error: <one line>, exit status 2, no traceback
"""
import argparse
import contextlib
import hashlib
import math
import os
import sys


class UserError(Exception):
    """A user's mistake (a flag, a file, a folder): printed as one line, exit status 2.
    ConfigError (config.py) and DatasetError (dataset.py) are kinds of it."""


def run_main(main, argv=None):
    """Run a script's main(argv); a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (a UserError) instead of the usage block."""

    def __init__(self, description=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# ---- flag checks: argparse types that name the bad value; argparse adds the flag's name --------

def _number(kind, low, inclusive, what):
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    return check


positive_int = _number(int, 0, False, "at least 1")
non_negative_int = _number(int, 0, True, "0 or more")
positive_float = _number(float, 0, False, "positive")
non_negative_float = _number(float, 0, True, "0 or more")


def random_seed(text):
    """A random seed: 0 to 2**32 - 1."""
    value = non_negative_int(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"{text} must be below 2**32")
    return value


def parse_bool(text):
    """argparse type for True/False flags: the seed's type=bool turned every non-empty string,
    "False" included, into True."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False (or 1/0), got {text!r}")


def port(text):
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1 to 65535)")
    return value


def make_folder(path, flag):
    """Create a folder (and its parents) that the script will write into; a one-line UserError
    naming the flag and the path when it cannot be created or written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create this folder ({e.strerror or e}); "
                        f"pass a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: this folder is not writable; pass a folder you can write to")
    return path


def output_file(path, flag):
    """Check, before any work, that a file can be written at `path`; a one-line UserError naming
    the flag and the path otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: its folder does not exist; create it or pass another {flag}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; pass a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: its folder is not writable; pass another {flag}")
    return path


# ---- the device ----------------------------------------------------------------------------------

def pick_device(name, local_rank=0):
    """--device auto | cuda | cuda:N | cpu | mps as a torch.device; under torchrun, `cuda` is the
    process's own GPU (LOCAL_RANK)."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu (or auto)")
        if name != "cuda" and not name[5:].isdigit():
            raise UserError(f"--device {name}: write a GPU as cuda or cuda:N, N from 0")
        index = local_rank if name == "cuda" else int(name[5:])
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this process wants GPU {index} but {torch.cuda.device_count()} "
                            f"are visible; lower torchrun's --nproc_per_node or pick another GPU")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available; use --device cpu (or auto)")
    if name not in ("cpu", "mps"):
        raise UserError(f"--device {name}: choose auto, cuda, cuda:N, cpu or mps")
    return torch.device(name)


def compile_cache_dir():
    """Where torch.compile keeps what it compiled, across runs and reboots, so that a graph is
    compiled once per machine: $TORCHINDUCTOR_CACHE_DIR when set (move it there), else
    ~/.cache/simple_ddpm/torchinductor (inductor's own default is under /tmp). Triton keeps its
    kernels in ~/.triton/cache ($TRITON_CACHE_DIR). Call before the first torch.compile."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "simple_ddpm", "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


# ---- files ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path, mode="wb", fsync=False):
    """Open a temporary file beside `path` for writing; when the block ends without an error it
    replaces `path` in one rename, so a killed run leaves either the old file or the new one, never
    half of one. The temporary name starts with a dot and ends in .tmp, so no loader lists it.
    fsync: flush it to the disk first (checkpoints), so a power cut cannot leave an empty file."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ---- committed weights: one small file with its sha256 beside it -----------------------------------

def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_sha256(*names):
    """One sha256 over these files of the repository, in order: the code behind a cached result."""
    digest = hashlib.sha256()
    for name in names:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def write_sha256(path):
    """path + ".sha256", in sha256sum's format (`sha256sum -c` checks it)."""
    with atomic_write(path + ".sha256", "w") as f:
        f.write(f"{sha256_of(path)}  {os.path.basename(path)}\n")


def check_sha256(path, remedy):
    """A one-line UserError, ending in `remedy`, unless the file's sha256 is the one recorded beside it:
    a damaged or replaced file of weights is never used silently."""
    recorded = None
    if os.path.isfile(path + ".sha256"):
        with open(path + ".sha256") as f:
            recorded = (f.read().split() or [None])[0]
    if recorded is None:
        raise UserError(f"{path}: no {path}.sha256 beside it to check it against; {remedy}")
    if recorded != sha256_of(path):
        raise UserError(f"{path}: its sha256 does not match {path}.sha256; the file is damaged or was replaced: "
                        f"{remedy}")

