"""Drop-in replacements for other libraries' checkpointing APIs, built on graphckpt's runtime.

``graphckpt.compat.deepspeed`` offers the names of ``deepspeed.checkpointing``. Submodules are
imported by name; importing this package imports none of them.
"""

__all__: list[str] = []
