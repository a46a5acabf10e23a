"""Process tools: commands that write, or check, the project's generated files."""
