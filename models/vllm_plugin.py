"""vLLM's plugin hook for this project (`vllm.general_plugins` entry point in pyproject.toml).

vLLM runs it in every process it starts; it only names the SpeechLM's model class, which vLLM imports when a model
folder's `config.json` asks for that architecture (`models.engine_config`). Kept apart from the class so loading
the plugin imports nothing heavy.
"""

from models.engine_config import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "models.vllm_speechlm:VTBlenderSpeechLM")
