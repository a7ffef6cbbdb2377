"""Every method module, imported so that each registers itself (forgetless.registry). A new method is
its module plus one line here."""

from forgetless import replay  # noqa: F401  (a data source: the `replay:` section, its presets and strength)
from forgetless.regularizers import dft, ewc, kl, l2sp, lfu, neftune, wise_ft  # noqa: F401
