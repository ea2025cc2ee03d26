"""The Hugging Face side: Hub files, ``load_pretrained_dispatched``, the loader registry, transformers and diffusers.

Importing this package registers what the core needs to know about those libraries without importing
them: the meta-build context that skips transformers' weight init of all-meta modules, and the dispatch
step that gives an encoder-decoder's encoder the output hook transformers' ``generate`` expects.
"""

from __future__ import annotations

from ..model.empty import register_meta_build_context
from ..runtime.dispatch import register_dispatch_step
from .transformers import hook_encoder_outputs, no_init_of_meta_modules

register_meta_build_context(no_init_of_meta_modules)
register_dispatch_step(hook_encoder_outputs)
