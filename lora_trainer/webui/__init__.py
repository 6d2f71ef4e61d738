"""The only code that imports the WebUI (``modules``) and gradio, always inside functions."""
