"""File names of the built-in tiny models (written by ``tiny_models.write_tiny_models``);
apart from it so that code without ComfyUI (workflow edits) can name them."""
TINY_SD35 = "edit_tiny_sd35.safetensors"
TINY_PIXART = "edit_tiny_pixart.safetensors"
TINY_VAE16 = "edit_tiny_taesd16.safetensors"
TINY_VAE4 = "edit_tiny_taesd4.safetensors"
# Untrained EDiT banks for the two tiny models (models/edit/).
TINY_BANKS = {"sd35": "edit_tiny_sd35_bank.safetensors", "pixart": "edit_tiny_pixart_bank.safetensors"}
