"""Decoding: one loop, swappable scores and commit schedules, and traces."""
from .loop import DECODERS, Decoder, DecodeResult, build_decoder, decode
from .sampling import filter_logp, gumbel_noise, sample_tokens
from .scores import SCORES
from .trace import Trace, afp, kendall_tau_b, tau_b
