"""Tools that drive a hub from outside: the device simulator (``hexa sim``) and the
benchmark (``hexa bench``)."""
