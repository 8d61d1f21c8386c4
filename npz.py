"""Named arrays from an .npz file (`isthmus run --inputs`, `isthmus npu run --inputs`): a bad
file is one-line InputError."""

from __future__ import annotations


def load_npz(path) -> dict:
    import zipfile

    import numpy as np

    from isthmus.errors import InputError
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None
