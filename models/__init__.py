from models.vgg import VGG, vgg16

__all__ = ["VGG", "vgg16"]
