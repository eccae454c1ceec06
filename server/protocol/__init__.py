"""What goes over the wire: request and response schemas, errors, streaming, tools, logprobs."""
