"""Command line of the toy data set: ``python -m afigan.data.toy OUT_DIR [--train N --val N --unlabeled N --seed S]``.

The generator itself is ``afigan.data.toy_shapes``; this module only runs it, and is never
imported by the package (so ``python -m`` does not find it already loaded).
"""

from .toy_shapes import main

if __name__ == "__main__":
    main()
