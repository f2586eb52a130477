#!/bin/sh
echo "hello from $(uname -m), built for ${TARGETPLATFORM:-an unknown platform}"
