from .danet import DANet, DANetLoss
from .resnet import DilatedResNet, dilated_resnet, load_torchvision_resnet

__all__ = ["DANet", "DANetLoss", "DilatedResNet", "dilated_resnet", "load_torchvision_resnet"]
