"""Model architecture only: no distributed code. Built on the meta device by the trainer."""
