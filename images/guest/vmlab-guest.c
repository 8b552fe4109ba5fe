/* placeholder: replaced by the real helper shortly */
#include <stdio.h>
int main(void) { puts("{\"event\":\"error\",\"op\":\"socket\",\"errno\":0,\"error\":\"stub\"}"); return 1; }
