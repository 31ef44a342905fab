#pragma once

#include "../csrc/local_attention.h"
