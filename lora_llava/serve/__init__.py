"""The HTTP server of `lora-llava serve`: OpenAI-style chat completions, its batching engine and the chat page.
May import the inference/evaluate layer, model, data, recipe and errors; never cli."""
