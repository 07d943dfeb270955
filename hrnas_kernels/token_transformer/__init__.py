"""The dynamic-token lightweight transformer (HR-NAS's transformer on the identity path):
resize to a token grid, project to L tokens, encoder + decoder layer, project back, resize,
residual; only the alive tokens are computed."""

from .api import token_transformer
from .module import DynamicTokenTransformer
from .reference import grid_coordinates

__all__ = ["token_transformer", "DynamicTokenTransformer", "grid_coordinates"]
