"""The framework's own protocol buffers (the saga status service), with generated code."""
