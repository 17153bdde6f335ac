"""Files that are complete or absent: every report, model, plot and config is written under a temporary name beside
its destination, flushed to disk, then renamed over it, so a crash never leaves a half-written file that a later run
(or TF Serving) would trust. One fsync policy: the file before the rename, its directory after it (best effort on
filesystems that refuse to fsync a directory).
"""

import contextlib
import json
import os
import tempfile


def fsync_path(path):
    """Best effort: flush one file or directory to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root):
    """Best effort: flush every file under `root` to disk (before the tree becomes visible under its final name)."""
    for directory, _, names in os.walk(root):
        for name in names:
            fsync_path(os.path.join(directory, name))


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` (same extension); when the block succeeds, what was written there is
    flushed and renamed to `path`; when it fails, it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, extension = os.path.splitext(os.path.basename(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{stem}.partial-", suffix=extension)
    os.close(fd)
    try:
        yield temporary
        fsync_path(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        fsync_path(directory)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """An open file (text "w" or binary "wb") whose content appears at `path` only once complete."""
    with atomic_path(path) as temporary, open(temporary, mode) as f:
        yield f


def write_text(path, text):
    with atomic_file(path) as f:
        f.write(text)
    return path


def save_figure(figure, path):
    """A matplotlib figure as a PNG at `path` (laid out tightly, complete or absent); the figure is closed."""
    import matplotlib.pyplot as plt
    try:
        figure.tight_layout()
        with atomic_file(path, "wb") as f:
            figure.savefig(f, format="png")
    finally:
        plt.close(figure)
    return path


def write_json(path, payload):
    """`payload` as indented JSON with sorted keys."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_model(model, path):
    """model.save (a .keras file), complete or absent."""
    with atomic_path(path) as temporary:
        model.save(temporary)
    return path
