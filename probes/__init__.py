from .activations import Activations
from .embed_lens import EmbedLens
from .logit_lens import LogitLens
