"""Everything that differs between Keras backends, and nothing else.

- :mod:`.select`: the one list of backends; choosing and starting one (GPUs, XLA flags, seeds);
- :mod:`.native_logs`: hiding the backends' native start-up log lines;
- :mod:`.engine`: the backend-neutral Engine and Runner bases (the step's maths, once);
- :mod:`.engine_jax`, :mod:`.engine_tensorflow`, :mod:`.engine_torch`: one module per backend,
  holding every backend-specific line (compiled steps, runners, devices, out-of-memory
  detection, distributed set-up);
- :mod:`.parallel`: data-parallel set-up shared by the engines;
- :mod:`.conv_gradients`: the convolution gradient rule the XLA backends compile.

Importing this package (or :mod:`.select`) imports no backend library.
"""
