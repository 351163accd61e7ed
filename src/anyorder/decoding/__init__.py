"""Decoding: one loop, swappable scores and commit schedules, and traces.

Importing this package registers every built-in decoder: the score decoders of ``loop``
(random, top_prob, margin, entropy, left_to_right) and the decoding lab's threshold,
ancestral, remask, edit, random_init, beam, jigsaw_entropy and scatter_offsets.
"""
from .loop import DECODERS, DecodeResult, DecodeState, Decoder, build_decoder, decode
from .sampling import filter_logp, gumbel_noise, sample_tokens
from .scores import SCORES
from .trace import Trace, afp, kendall_tau_b, tau_b
from . import ancestral, beam, edit, jigsaw_entropy, learned, random_init, remask, scatter_offsets, threshold  # noqa: F401  (registration)
