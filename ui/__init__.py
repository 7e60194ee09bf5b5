"""The Gradio app's parts: one module per tab, the shared `Arena`, charts and the named API."""
