#!/usr/bin/env python3
"""Convert the UCI optical handwritten digits (the copy bundled with scikit-learn) to the
compact file NormKit ships: Sources/Training/Resources/digits.safetensors.

Run once by hand (scikit-learn reads its bundled CSV; nothing is downloaded):

    /tmp/torchenv/bin/pip install scikit-learn
    /tmp/torchenv/bin/python Tools/convert_digits.py Sources/Training/Resources/digits.safetensors

Tensors: `images` U8 is not among NormKit's dtypes, so images are F32 [1797, 1, 8, 8] with the
original integer values 0..16, and `labels` I64 [1797].
"""
import json
import sys

import numpy as np
from sklearn.datasets import load_digits


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "Sources/Training/Resources/digits.safetensors"
    digits = load_digits()
    images = digits.images.astype("<f4").reshape(-1, 1, 8, 8)
    labels = digits.target.astype("<i8")
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    header = {
        "__metadata__": {
            "source": "UCI ML optical recognition of handwritten digits (test set), as bundled by scikit-learn",
            "converter": "Tools/convert_digits.py",
        },
        "images": {"dtype": "F32", "shape": list(images.shape), "data_offsets": [0, images.nbytes]},
        "labels": {"dtype": "I64", "shape": list(labels.shape),
                   "data_offsets": [images.nbytes, images.nbytes + labels.nbytes]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(out, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(images.tobytes())
        f.write(labels.tobytes())
    print(f"wrote {out}: {images.shape[0]} images, label counts {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
