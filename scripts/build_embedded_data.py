"""Rebuild hrnas/data/fashion_mnist_subset.npz, the Fashion-MNIST subset shipped in the package.

Source: Fashion-MNIST by Zalando Research (https://github.com/zalandoresearch/fashion-mnist),
licence MIT, read from the Debian package ``dataset-fashion-mnist``:

    apt-get update && apt-get install -y dataset-fashion-mnist
    python scripts/build_embedded_data.py            # reads /usr/share/datasets/fashion-mnist

The subset is 800 images per class from the train split and 200 per class from t10k (8,000 +
2,000), chosen with a fixed seed (see hrnas.data.fashion_mnist.select_balanced), stored with their
indices in the original splits. The output is byte-reproducible: running this again gives the same
file, whose SHA-256 must equal hrnas.data.fashion_mnist.EMBEDDED_SHA256 (the script says so and
exits 1 when it does not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hrnas.data import fashion_mnist as fm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=fm.DEBIAN_ROOT, help="folder with the four IDX gz files"
    )
    parser.add_argument(
        "--out", type=Path, default=fm.embedded_path(), help="where to write the npz"
    )
    args = parser.parse_args(argv)
    if not fm.full_set_available(args.root):
        parser.error(
            f"Fashion-MNIST IDX files not found in {args.root}; install the Debian package "
            "dataset-fashion-mnist or pass --root"
        )
    fm.write_npz(args.out, fm.build_subset(args.root))
    digest = fm.sha256_file(args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB), sha256 {digest}")
    if digest != fm.EMBEDDED_SHA256:
        print(f"differs from the recorded EMBEDDED_SHA256 {fm.EMBEDDED_SHA256}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
