"""vLLM integration; vLLM loads `KVShelfConnector` from this module (kv_connector_module_path)."""

from kvshelf.integrations.vllm.connector import KVShelfConnector

__all__ = ["KVShelfConnector"]
