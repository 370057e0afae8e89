"""Developer tools: code generation and generated documentation."""
