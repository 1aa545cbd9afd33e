module spright.dev/zoo

go 1.19
