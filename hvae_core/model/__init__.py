"""The HVAE model: Keras 3 layers and ``keras.ops`` only (importing this imports Keras)."""
