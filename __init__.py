"""isthmus: compile third-party LLM graphs, run them sealed, serve them over the chat API.

    import isthmus
    model = isthmus.load("smollm2-135m-instruct")   # a registry name or a path (.gguf, .onnx, HF folder)
    exe = isthmus.compile(model, target="reference")
    for piece in isthmus.chat(exe, [{"role": "user", "content": "Hi"}], max_tokens=64):
        print(piece, end="")

Nothing heavy is imported until one of these is called.
"""

__version__ = "0.1.0"
__all__ = ["load", "compile", "chat", "__version__"]


def load(name_or_path, **kwargs):
    """Import a model: a registry name, a .gguf / .onnx file, or a HF safetensors folder."""
    from isthmus.models import load as _load

    return _load(name_or_path, **kwargs)


def compile(model, target: str | None = None, **kwargs):  # noqa: A001  (the public verb)
    """Run the pass pipeline and lower the graph for `target` (default: the best here); returns an Executable."""
    from isthmus.compiler.targets import compile_model

    return compile_model(model, target=target, **kwargs)


def chat(exe, messages, **kwargs):
    """Stream the assistant's reply to `messages` (OpenAI-style dicts) as text pieces."""
    from isthmus.runtime.generate import chat as _chat

    return _chat(exe, messages, **kwargs)
