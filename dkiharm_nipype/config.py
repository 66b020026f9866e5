"""Small frozen dataclasses describing one run of the BIDS-App."""
