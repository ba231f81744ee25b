"""The data model: structs, named axes, selectors and variables.

This layer knows nothing about Equinox or Flax (a test enforces it).

Importing the package completes two classes with behaviour defined by modules
above them: :mod:`~pzbridge.core.named_axes_ops` installs the operations that
compute on data (``astype``, indexing, arithmetic, reductions) on
``NamedArrayBase``, and :mod:`~pzbridge.core.selectors` registers the function
behind ``Struct.select()``. Python runs this file before any
``pzbridge.core.*`` module, so the methods are in place whichever module is
imported first, while the lower modules never import the higher ones (no
import cycles; ``tests/test_layering.py`` checks it, docs/architecture.md
explains the layers).
"""

from pzbridge.core import named_axes_ops, selectors  # noqa: F401 - imported for their registrations.
