"""The built-in reward experts, one module each: the model, its pydantic `Config` (every field documented)
and `build_tiny`, the writer of its tiny random-weight checkpoint in the published format.

The registry (`t2i_reward.rewarders.registry.BUILTIN`) names them as "module:class" and imports a module
on first look-up, so importing this package imports no model code.
"""
