"""Bottom-up networks wrapped as Detectron2 backbones, and their neck builders."""
