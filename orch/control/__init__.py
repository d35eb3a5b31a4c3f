"""The control plane: what drives a Ray cluster from outside to start, inspect and change a stack (the
``llama-orch`` CLI, the local head, private taps). The rest of ``orch`` is pure (no Ray calls, no
processes started); ``actors/`` and ``apps/`` are the Ray shells the control plane deploys."""
