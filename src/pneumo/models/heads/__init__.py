"""Heads: the contract (pneumo.models.heads.base) and the registered heads. Importing this
package registers them; a new head is one module here plus its import below."""

from pneumo.models.heads import centre, classifier, fcos, mask  # noqa: F401  (registration)
from pneumo.models.heads.base import HEADS, FeatureInfo, Features, Head

__all__ = ["HEADS", "FeatureInfo", "Features", "Head"]
