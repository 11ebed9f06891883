from models.vgg import vgg16

__all__ = ["vgg16"]
