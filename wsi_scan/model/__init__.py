"""Networks, the model card and the eval-time transforms. The bundled default model lives here."""
