"""Tool calling in OpenAI's format, for any tool schema: parsing, scoring and the grammar of calls."""
