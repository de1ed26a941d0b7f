"""Judge backends: produce judge-format outputs for pairwise judgment prompts.

Each honours :class:`openrlhf_persrm.contracts.JudgeBackend` and is registered in
``openrlhf_persrm.registry.judge_backends`` (entry-point group ``openrlhf_persrm.judges``):

``openai`` (:mod:`.openai_backend`)
    an OpenAI-compatible chat-completions endpoint, e.g. ``vllm serve`` of a trained PersRM;
``local`` (:mod:`.local`)
    a transformers model in this process, batching concurrent requests on the CPU engine.

:mod:`.faults` types why a judgment failed (``JudgeError`` subclasses with a ``kind``). Both
backends take ``generate(requests, deadline=t)`` (a ``time.monotonic()`` value): judgments not
done by then are cancelled and come back as ``JudgeDeadline``.

:mod:`.openai_client` is the async HTTP client both the ``openai`` backend and the data
pipeline's teacher use. Nothing heavy is imported here.
"""
